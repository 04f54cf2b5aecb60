"""vast.ai: its API client (``api``: offers, interruptible bids and instances over REST)."""
