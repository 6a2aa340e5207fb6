"""SLURM clusters: profiles and the sbatch template (package data, affinage.resources), submission, status."""
