"""Pure tensor combination methods: merging, trimming, ensemble voting and attack identification."""
