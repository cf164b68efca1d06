"""Command-line interface: `layerexit train | evaluate | benchmark | demo | list`."""
