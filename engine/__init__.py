"""credential-engine: keeps crypto-exchange API keys encrypted, verified, rotated and revoked."""
