/* uvloop's own header, named by its .pxd files; adoption.pyx uses nothing of it. */
