"""`launcher ui`: a local web page to configure, validate, submit and watch runs.

Optional (`pip install 'kubetune[ui]'`: Starlette + uvicorn + Pillow); nothing here is
imported by the rest of the launcher, so `launcher --help` never pays for it.
"""
