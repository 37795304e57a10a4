{
  "targets": [
    {
      "target_name": "splice_relay",
      "conditions": [
        ["OS=='linux'", {
          "sources": ["splice_relay.c", "tls_record.c", "nftables.c", "original_dst.c"],
          "libraries": ["-ldl"],
          "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
          "defines": ["NAPI_VERSION=8"]
        }, {
          "type": "none"
        }]
      ]
    }
  ]
}
