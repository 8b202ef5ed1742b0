"""Fair dispatch: jobs are parked per (queue, user) and published only when they can run."""
