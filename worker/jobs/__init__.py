"""arq job functions, one module per subsystem; worker/app.py registers them."""
