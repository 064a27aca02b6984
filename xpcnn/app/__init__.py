"""What people run: the command line and the programs behind its verbs.

    cli.py      ``xpcnn train | evaluate | predict``: options, exit codes, one-line errors
    predict.py  classifying picture and array files with a checkpoint
    report.py   ``evaluate --report``: confusion matrix, per-class scores, mistakes, feature maps
    plots.py    the figures (matplotlib, written atomically)
"""
