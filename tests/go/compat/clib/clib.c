/* A shared object that is not a Go plugin: what a C library uploaded as a plugin looks like. */
int clib_answer(void) { return 42; }
