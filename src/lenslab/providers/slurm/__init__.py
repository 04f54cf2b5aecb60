"""provider = "slurm": the box is a Slurm cluster's login node, reached over SSH."""
