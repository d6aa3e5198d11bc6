"""The HTTP front door: OpenAI's Images API (`/v1/images/generations`, `/v1/images/edits`, streamed
partial images as server-sent events) on FastAPI + uvicorn, mapped onto the prefill service's
`Generate` with `grpc.aio` (`client.AsyncBagelClient`). `python -m gateway --help` lists the
settings; docs/http_api.md documents every endpoint, field, error and event."""
