"""One project's run: the workspace, the session and everything it starts and watches."""
