"""The OpenAI-compatible surface: chat completions and the Responses API over Spool's jobs, so
existing OpenAI clients work by changing ``base_url``. Request parsing, the objects and the event
streams live here; the streaming function's web app only routes to them."""
