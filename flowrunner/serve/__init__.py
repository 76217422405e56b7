"""`flowrunner serve`: a flow behind an OpenAI-compatible endpoint (openai_api.py: the protocol's
shapes; answer.py: one request's run; app.py: the routes; command.py: the server's life)."""
