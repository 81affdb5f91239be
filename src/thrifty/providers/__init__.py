"""Wire adapters to model providers, all speaking OpenAI's chat shape towards the gateway."""
