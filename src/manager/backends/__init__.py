"""Where cache nodes come from: local processes (embedded) or an EC2 Auto Scaling Group."""
