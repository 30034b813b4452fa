"""The gateway: the Starlette app that serves the engine (WebSocket protocol, HTTP and
OpenAI-style API, metrics, API keys, limits, NATS events), `bwr up` with its embedded
nats-server, the `bwr chat` client, and the `bwr` command line. It drives the engine through its
public Session API and never reaches into the model."""
