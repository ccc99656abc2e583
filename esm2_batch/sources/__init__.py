"""Where genes and isoforms come from.

    base.py            IsoformSource protocol, SourceOptions
    factory.py         open_source: the options -> the source they name
    gene_lists.py      txt/csv/tsv gene lists: IDs vs symbols, dedupe
    h5ad_genes.py      the highly variable genes of an .h5ad (var only, never X)
    ensembl_rest/      Ensembl REST: client.py, transport.py, parse.py (async, rate-limited)
    ensembl_ftp.py     where Ensembl's FTP files are; downloading them
    ensembl_files.py   reading pep.all.fa.gz + canonical.tsv.gz, offline
    synonyms.py        outdated symbols -> current genes (xrefs rule, HGNC's table)
    unresolved.py      why a gene was not resolved: the likely reason, from its name
    isoforms_fasta.py  the --isoforms / --save_isoforms FASTA
    fasta.py           the one FASTA reader
"""
