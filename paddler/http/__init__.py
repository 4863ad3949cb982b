"""HTTP front ends: Falcon ASGI apps (inference, management, OpenAI-compatible)
served by gunicorn's ``asgi`` workers, each talking to the broker through
``paddler.client.AsyncClient``. They hold no cluster state."""
