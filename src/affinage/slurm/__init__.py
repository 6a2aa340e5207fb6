"""SLURM clusters: profiles (configs/clusters), sbatch scripts (templates in slurm/), submission, status."""
