"""The index folder: everything an index stores and how it is read, written, checked and moved.

* `index_folder`: the folder's layout and generations (write, load, remove), rejected rows, the
  exactly-once check of every commit, a killed writer's debris.
* `vector_index`: the FAISS index of the vectors (ids kept), one-scan top and bottom k;
  `vector_file`: the vectors file read in place and written as a stream.
* `row_table`: the LanceDB table of the rows' text and build statistics.
* `manifest`: the commit point (format version, schema, own checksum); `identity`: the index identity,
  built and checked in one place.
* `journal`: a build's finished chunks (`journal.ChunkRecord`), for resumption; `lock`: the writer lock
  and the readers' leases.
* `checksums`, `verify`: the files' checksums and the stamps that skip unchanged files.
* `shards`: merge of a build's static shards.
* `bundle`, `bundle_export`, `bundle_import`, `bundle_check`: the bundle format, written and read.

Nothing is imported here: import the module you need (``from rapidin_index.store import manifest``).
"""
