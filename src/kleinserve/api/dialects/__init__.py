"""Provider dialects: thin translations between a provider's wire format and kleinserve's jobs."""
