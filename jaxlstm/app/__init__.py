"""The application built on the library: the ``jaxlstm`` command and its character-model job.

Needs the ``train`` extra (``pip install 'jaxlstm[train]'``): orbax-checkpoint,
tqdm and matplotlib. ``import jaxlstm`` never imports this package.
"""
