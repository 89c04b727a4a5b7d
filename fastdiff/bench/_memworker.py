"""Worker process for CPU peak-memory measurements of the scaling suite (see scaling.cpu_peaks)."""
from .scaling import worker_main

if __name__ == "__main__":
    worker_main()
