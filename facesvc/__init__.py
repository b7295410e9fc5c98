"""facesvc: face verification for the job-training programme."""
