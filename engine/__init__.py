"""The training engine: one loop for every model and method (trainer.py), its command line (cli.py)."""
