"""Object storage backends behind one protocol: a local folder and any S3 API."""
