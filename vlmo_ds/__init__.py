"""vlmo_ds: VLMo vision-language pre-training at scale."""
