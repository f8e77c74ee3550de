"""sierra-prefect: run SIERRA stage 2 on Prefect 3."""
