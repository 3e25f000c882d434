"""Who is calling, and what they may do: API keys (hashed, in a file the server re-reads),
client certificates (mTLS), per-stream-type permissions. See docs/design/security.md."""
