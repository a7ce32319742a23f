"""Static files of the server: serve.html, the page at `/`."""
