"""The training layer in parts, one job each; :mod:`jaxlstm.training` is its public face.

* :mod:`.steps`: the optimizer and the jit-compiled train and eval steps;
* :mod:`.parallel`: meshes, processes, and putting batches and state on them;
* :mod:`.checkpoints`: orbax checkpoints with digests, an intact fallback, set-aside;
* :mod:`.records`: the logging window, the metrics file, TensorBoard, the progress bar;
* :mod:`.evaluation`: when to evaluate, the best evaluation and early stopping;
* :mod:`.stopping`: SIGINT and SIGTERM as a stop request, agreed across processes;
* :mod:`.loop`: :func:`fit`, which drives the others.
"""
