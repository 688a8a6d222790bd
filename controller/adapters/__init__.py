"""The world: ctr, the store on disk, the status file, metrics, logs, the OS seam."""
