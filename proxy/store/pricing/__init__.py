"""Prices and cost: the pure price book (book.py), the `prices` table (table.py), OpenRouter's models list
(openrouter.py), re-pricing logged rows (reprice.py) and the running proxy's book (pricer.py)."""
