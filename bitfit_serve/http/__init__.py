"""The HTTP faces of the server, one module a concern: ``schemas`` (request and response bodies),
``auth`` (bearer tokens), ``edge`` (middleware and error bodies), and one router per route group
(``inference``, ``admin``, ``ops``). ``bitfit_serve.server.create_app`` assembles them."""
