"""The bundled training configs, installed as the `tttjax.configs` package (setup.py maps it
here), so `--config NAME[:ARG]` (`tiny:ttt_mlp`, `cogvideox_5b:63s,ttt_mlp`) finds them
from any directory. Each module defines `get_config(arg) -> ml_collections.ConfigDict`."""
