"""`flowrunner serve`: a flow behind an OpenAI-compatible endpoint (openai_api.py and responses_api.py:
the two protocols' shapes; answer.py: one request's run; app.py: the routes; stream.py: the streamed
answer; outcome.py: errors and log lines; admission.py, cors.py, limits.py: who and what may come in;
command.py: the server's life; drain.py: SIGTERM; workers.py: --workers; wire.py: the per-chunk path)."""
