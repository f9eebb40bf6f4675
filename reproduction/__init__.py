"""Paper tables in one command: TOML tables (tables.py), local/submitit/SLURM launch (launch.py), the report (report.py)."""
