"""Tool calling owned by the mesh: rendering tools into a model's prompt,
parsing its calls back out (whole or streamed), and the grammar that forces a
call. Transport-free: nothing here imports grpc, HTTP or generated code."""
