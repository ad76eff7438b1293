"""The embedding explorer (Streamlit app, optional extra): maps of exported embeddings (t-SNE,
UMAP, PCA), k-means clusters, listening to points, labels export, training curves and a training
launcher. Imports only from bioaudio.data, bioaudio.models and bioaudio.inference; the Streamlit
page itself is `app.py` (`bioaudio explore EMBEDDINGS.parquet`), everything else runs without it
(the static maps of `bioaudio plot-embeddings` too)."""
