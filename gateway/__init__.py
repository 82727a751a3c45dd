"""chatqueue-gateway: an OpenAI-compatible HTTP layer over the asyncio producer."""
