"""dcgan_dist: the lab's DCGAN trained on CelebA, from a laptop CPU to a SLURM cluster of GPUs."""

__version__ = "0.1.0"
