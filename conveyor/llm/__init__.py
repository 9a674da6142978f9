"""The model API: one streamed Messages API call and the classification of its failures."""
