"""The command-line tools of vqmoe-ds, installed as the package ``vqmoe_tools``: each is a script
(``python tools/NAME.py``) and a console script (``vqmoe-NAME``, setup.py)."""
