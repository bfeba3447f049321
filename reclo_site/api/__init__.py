"""What every API app shares: the error envelope, codes, throttling."""
