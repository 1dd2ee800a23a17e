"""What runs leave on disk: the run record and the results layout."""
