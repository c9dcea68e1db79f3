"""Every `transfusion <command>`: argparse options and run(), one module each, on the library below."""
