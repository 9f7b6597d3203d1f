"""The web console for fleet operators, served at ``/ui`` by the API's HTTP server (``web.Console``)."""
