"""Provider batch adapters: OpenAI Batch (files + batches), Anthropic Message Batches, replay."""
