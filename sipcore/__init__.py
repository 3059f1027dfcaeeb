"""SIP itself: sans-IO message layer, transactions, digest auth, and the asyncio server pieces."""
