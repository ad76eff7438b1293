"""The seed project's explorer command, kept working:

    streamlit run beats/interactive_vis.py -- --data_dir D --checkpoint_path C --max_samples N

It runs the bioaudio explorer (bioaudio/explorer/app.py) in "compute embeddings from a data
folder and a checkpoint" mode; every option of `bioaudio explore` works here too.
"""

import sys

from bioaudio.explorer.app import main

main(sys.argv[1:])
