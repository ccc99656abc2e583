"""What lands on disk.

    atomic.py    the one atomic writer (fsync, cleanup, mode from the umask)
    esm_file.py  esm_all.pt: contract, reader, writer, gene pooling (gene_vectors)
    partial.py   the resumable partial store of an unfinished run
"""
